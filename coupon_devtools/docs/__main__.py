"""``python -m coupon_devtools.docs [--check]``: write the generated reference pages, or check
that they are current (exit 1, naming the stale ones)."""

from __future__ import annotations

import sys

from coupon_devtools.docs import REGENERATE, stale_pages, write_pages


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        stale = stale_pages()
        for page in stale:
            print(f"{page} is stale: run `{REGENERATE}`", file=sys.stderr)
        return 1 if stale else 0
    if argv[1:]:
        print("usage: python -m coupon_devtools.docs [--check]", file=sys.stderr)
        return 2
    changed = write_pages()
    print("\n".join(f"wrote {page}" for page in changed) or "every generated page is current")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
