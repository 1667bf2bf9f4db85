"""The risk-desk dashboard: Streamlit over the Parquet lake through DuckDB.

``anomstream dashboard`` runs ``dashboard/app.py`` with ``streamlit run``, which passes the app
no arguments of its own: the command hands it the lake and the refresh period through these
environment variables.
"""

LAKE_ENV = "ANOMSTREAM_LAKE"
REFRESH_ENV = "ANOMSTREAM_REFRESH_SECONDS"
