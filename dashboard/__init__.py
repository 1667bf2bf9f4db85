"""The risk-desk dashboard: Streamlit over the Parquet lake through DuckDB."""
