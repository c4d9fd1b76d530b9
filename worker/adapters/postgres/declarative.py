"""The ledger's tables declared as classes, as SQLAlchemy's ORM declares them, into plain tables.

``models`` reads like ORM models (``Mapped[...] = mapped_column(...)``) and type-checks as
them, but the ledger never loads a row into an object: its statements are SQLAlchemy core
(``update(m.Entity).where(m.Entity.id == ...)``). Mapping the classes would cost every worker
process the ORM's mappers and instrumentation for nothing; this builds the same ``Table`` per
class instead (the names, types, nullability and arguments the ORM would give its columns), and
makes each class attribute that table's ``Column``.

At run time a class stands for its table in a statement (``__clause_element__``); type checkers
see SQLAlchemy's own ``DeclarativeBase``, ``Mapped`` and ``mapped_column`` (``models``).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, ClassVar

from sqlalchemy import Boolean, Column, DateTime, Float, Integer, MetaData, Numeric, String, Table
from sqlalchemy.types import TypeEngine

# What the ORM's default type map gives a column declared without a type, by its annotation.
_TYPE_OF_ANNOTATION: dict[str, type[TypeEngine[Any]]] = {
    "bool": Boolean, "int": Integer, "float": Float, "str": String, "datetime": DateTime,
    "Decimal": Numeric,
}
_MAPPED = re.compile(r"^Mapped\[(?P<inner>.*)\]$")


class Mapped:
    """Only a name at run time: ``models`` annotates with it (see the module's docstring)."""


class MappedColumn:
    """What ``mapped_column`` was given, turned into a ``Column`` once the class is known."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs

    def column(self, key: str, annotation: str) -> Column[Any]:
        found = _MAPPED.match(annotation.replace(" ", ""))
        if found is None:
            raise TypeError(f"{key}: annotate a column as Mapped[...], not {annotation}")
        inner = found.group("inner")
        optional = inner.endswith("|None") or inner.startswith("Optional[")
        args = list(self.args)
        name = args.pop(0) if args and isinstance(args[0], str) else key
        if not any(isinstance(a, TypeEngine) or (isinstance(a, type)
                                                 and issubclass(a, TypeEngine)) for a in args):
            base = inner.removesuffix("|None")
            if base not in _TYPE_OF_ANNOTATION:
                raise TypeError(f"{key}: give the column's type, {base} has no default one")
            args.insert(0, _TYPE_OF_ANNOTATION[base]())
        kwargs = dict(self.kwargs)
        # As the ORM: NOT NULL unless the annotation admits None (a primary key never does).
        nullable = kwargs.pop("nullable", None)
        if nullable is None:
            nullable = optional and not kwargs.get("primary_key", False)
        return Column(name, *args, nullable=nullable, **kwargs)


def mapped_column(*args: Any, **kwargs: Any) -> Any:
    return MappedColumn(args, kwargs)


class DeclarativeBase:
    """A class per table: its ``__table__``, and a ``Column`` for each attribute."""

    metadata: ClassVar[MetaData]
    __table__: ClassVar[Table]
    __tablename__: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__tablename__" not in cls.__dict__:
            return
        annotations = inspect.get_annotations(cls)
        columns = {key: spec.column(key, str(annotations[key]))
                   for key, spec in cls.__dict__.items() if isinstance(spec, MappedColumn)}
        table_args = cls.__dict__.get("__table_args__", ())
        cls.__table__ = Table(cls.__tablename__, cls.metadata, *columns.values(), *table_args)
        for key, column in columns.items():
            setattr(cls, key, cls.__table__.c[column.key])

    @classmethod
    def __clause_element__(cls) -> Table:
        return cls.__table__
