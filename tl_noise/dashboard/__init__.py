"""The Streamlit dashboard over tl-noise run directories (needs the ``app`` extra).

It reads runs only through :mod:`tl_noise.runs`. ``charts`` builds the plotly figures (no
Streamlit) and ``graph`` the circuit graph's, ``views`` renders one section each and ``circuit``
the Circuit graph tab, ``app`` picks the run and lays the page out.
Launch it with ``tl-noise app RUNS_ROOT`` (:func:`tl_noise.cli.app.launch`) or
``streamlit run apps/dashboard.py -- RUNS_ROOT``.
"""
