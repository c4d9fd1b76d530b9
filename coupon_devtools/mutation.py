"""``make mutation``: mutmut over the rules and the ledger's claim / outcome code, and the score.

The mutants run against the unit tests and the ledger contract (``[tool.mutmut]`` in
pyproject.toml). Of the ledger's statements (``worker/adapters/postgres/issuing.py`` and the
shared ``tables.py``) only the code that claims an entity and records its outcome is mutated,
and of ``worker/adapters/postgres/hot_path.py`` the builders of the two statements' parameters;
docs/testing.md lists the survivors we keep.
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

_ISSUING = "worker.adapters.postgres.issuing."
_TABLES = "worker.adapters.postgres.tables."
#: Mutant names (mutmut's globs): module functions are ``x_name``, methods ``xǁClassǁname``.
SELECTED = (
    "worker.domain.model.*",
    "worker.domain.verdicts.*",
    "worker.domain.policy.*",
    "worker.domain.runtime_policy.*",
    # The statements' text is built at import (``_wire``, ``_sql_list``), before a mutant is on.
    "worker.adapters.postgres.hot_path.x_transition_rows__mutmut_*",
    "worker.adapters.postgres.hot_path.x_coupon_rows__mutmut_*",
    "worker.adapters.postgres.hot_path.x_coupon_row__mutmut_*",
    "worker.adapters.postgres.hot_path.x_call_rows__mutmut_*",
    "worker.adapters.postgres.hot_path.x_as_json__mutmut_*",
    "worker.adapters.postgres.hot_path.x__json_default__mutmut_*",
    _TABLES + "x__number__mutmut_*",
    _TABLES + "x__seconds__mutmut_*",
    _ISSUING + "x__claim_statement__mutmut_*",
    _ISSUING + "x__claim_statements__mutmut_*",
    _ISSUING + "xǁIssuingStatementsǁ_claim__mutmut_*",
    _ISSUING + "xǁIssuingStatementsǁ_claim_for__mutmut_*",
    _ISSUING + "xǁIssuingStatementsǁtake_in__mutmut_*",
    _ISSUING + "xǁIssuingStatementsǁclaim_event__mutmut_*",
    _ISSUING + "xǁIssuingStatementsǁclaim_entity__mutmut_*",
    _ISSUING + "xǁIssuingStatementsǁrecord__mutmut_*",
    _TABLES + "xǁSessionBoundǁrefresh_event_states__mutmut_*",
)


def _mutmut() -> str:
    return str(Path(sys.executable).with_name("mutmut"))


def results() -> dict[str, str]:
    """Each selected mutant's status from mutmut's last run."""
    out = subprocess.run([_mutmut(), "results", "--all", "true"], capture_output=True,  # noqa: S603 - argv is ours
                         text=True, check=True).stdout
    statuses: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and any(fnmatch.fnmatchcase(name, pattern) for pattern in SELECTED):
            statuses[name] = status
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--keep", action="store_true",
                        help="reuse mutmut's results from the last run (mutants/)")
    args = parser.parse_args()
    if not args.keep:
        shutil.rmtree("mutants", ignore_errors=True)
    run = subprocess.run([_mutmut(), "run", "--max-children", str(args.max_children),  # noqa: S603 - ours
                          *SELECTED], capture_output=True, text=True, check=False)
    statuses = results()
    if run.returncode != 0 or not statuses:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
        return 1
    survived = sorted(n for n, s in statuses.items() if s != "killed")
    killed = len(statuses) - len(survived)
    for name in survived:
        print(f"{statuses[name]:>10}  {name}")
    print(f"mutation score: {killed}/{len(statuses)} killed "
          f"({100 * killed / len(statuses):.1f}%), {len(survived)} not killed "
          "(`mutmut show NAME` shows one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
