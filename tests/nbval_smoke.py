"""Execute every notebook under nbval, in order, on the smoke-sized parameter set.

Each notebook in ``notebooks/`` is copied into a temporary folder with the smoke
parameters injected into its ``parameters`` cell (papermill, prepare only), then
``pytest --nbval-lax`` runs the copies in order: a cell that raises fails the test.
The folder is removed when every notebook passed and kept, for inspection, when one failed.
Usage: ``python tests/nbval_smoke.py [PARAMS_FILE]``; exits with pytest's status.
"""
import shutil
import sys
import tempfile
from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "parameters" / "smoke" / "simple_seed0.yaml"


def main(argv: list[str]) -> int:
    params_file = Path(argv[0]).resolve() if argv else SMOKE
    work = Path(tempfile.mkdtemp(prefix="citylib-nbval-"))
    prepared = []
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        target = work / nb.name
        pm.execute_notebook(str(nb), str(target), prepare_only=True, kernel_name="python3",
                            parameters={"params_file": str(params_file), "outputs": str(work / "outputs")})
        prepared.append(str(target))
    print(f"nbval on {len(prepared)} notebooks in {work}", flush=True)
    status = pytest.main(["-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
                          "--rootdir", str(work), *prepared])
    if status == 0:
        shutil.rmtree(work, ignore_errors=True)  # kept only when a notebook failed, to inspect
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
