"""The ledger's models build, without the ORM, the very tables SQLAlchemy's ORM builds from them."""

from __future__ import annotations

import re
import sys
import types
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, MetaData, Text, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from worker.adapters.postgres import models
from worker.adapters.postgres.declarative import DeclarativeBase, Mapped, mapped_column


def _ddl(metadata: MetaData) -> list[str]:
    dialect = postgresql.dialect()
    found = []
    for table in metadata.sorted_tables:
        found.append(str(CreateTable(table).compile(dialect=dialect)))
        found += sorted(str(CreateIndex(index).compile(dialect=dialect))
                        for index in table.indexes)
        found += [f"{table.name}.{c.key}: {c.name} {c.type!r} nullable={c.nullable} "
                  f"autoincrement={c.autoincrement}" for c in table.c]
    return found


def test_the_models_are_the_tables_the_orm_would_map() -> None:
    # models.py as it type-checks: the ORM's DeclarativeBase, Mapped and mapped_column.
    source = Path(models.__file__).read_text(encoding="utf-8")
    as_orm, count = re.subn(r"^if TYPE_CHECKING:$", "if True:", source, flags=re.MULTILINE)
    assert count == 1
    module = types.ModuleType("ledger_models_as_orm")
    sys.modules[module.__name__] = module  # the ORM resolves the annotations in the module
    try:
        exec(compile(as_orm, models.__file__, "exec"), module.__dict__)  # noqa: S102
        assert _ddl(module.Base.metadata) == _ddl(models.Base.metadata)
    finally:
        del sys.modules[module.__name__]


class _Base(DeclarativeBase):
    metadata = MetaData()


class _Thing(_Base):
    __tablename__ = "things"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    label: Mapped[str | None] = mapped_column("name", Text)
    flag: Mapped[bool] = mapped_column()
    seen_at: Mapped[datetime | None] = mapped_column(nullable=False)


def test_a_class_attribute_is_its_tables_column_and_the_class_the_table() -> None:
    table = _Thing.__table__
    assert [c.name for c in table.c] == ["id", "name", "flag", "seen_at"]
    assert _Thing.label is table.c["name"]
    assert (table.c["id"].nullable, table.c["name"].nullable, table.c["flag"].nullable,
            table.c["seen_at"].nullable) == (False, True, False, False)
    assert str(update(_Thing).where(_Thing.id == 1).values(flag=True)).startswith(
        "UPDATE things SET flag=")
    assert "FROM things" in str(select(_Thing.label))


def test_a_column_without_a_type_needs_an_annotation_with_a_default_one() -> None:
    with pytest.raises(TypeError, match="give the column's type"):
        class _Untyped(_Base):
            __tablename__ = "untyped"

            id: Mapped[int] = mapped_column(primary_key=True)
            data: Mapped[dict[str, int]] = mapped_column()
