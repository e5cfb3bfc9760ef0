"""Rewrite docs/compatibility.md's table from the matrix in core/compat.py over train.py's flags.

    python docs/compatibility.py            # rewrite the table (tests/test_compat.py fails when it is stale)
    python docs/compatibility.py --print    # print it instead
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from core import compat  # noqa: E402

if __name__ == "__main__":
    table = compat.markdown(train.Config())
    if sys.argv[1:] == ["--print"]:
        print(table, end="")
    elif sys.argv[1:]:
        sys.exit("usage: python docs/compatibility.py [--print]")
    else:
        compat.update_doc(compat.DOC, table)
