"""Streamlit entry point: ``streamlit run apps/dashboard.py -- RUNS_ROOT`` (the page itself lives
in :mod:`tl_noise.dashboard.app`, which is shipped with the package)."""

from tl_noise.dashboard.app import main

main()
