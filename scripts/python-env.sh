# Sourced by the other scripts: sets $python, the Python that fastgen is installed in and runs from.
# $PYTHON when set; else the active virtual environment (or conda environment); else the project's own .venv,
# made here on first use. So nothing goes into a global Python, and a system Python that refuses pip installs
# (PEP 668, Debian and Ubuntu) is only used to make the venv.
if [ -n "${PYTHON:-}" ]; then
  python=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  python="$VIRTUAL_ENV/bin/python"
elif [ -n "${CONDA_PREFIX:-}" ]; then
  python="$CONDA_PREFIX/bin/python"
else
  if [ ! -x .venv/bin/python ]; then
    echo "making a virtual environment in .venv"
    if ! python3 -m venv .venv; then
      echo "could not make .venv: install Python's venv module (Debian/Ubuntu: apt install python3-venv)" >&2
      exit 1
    fi
  fi
  python="$PWD/.venv/bin/python"
fi
