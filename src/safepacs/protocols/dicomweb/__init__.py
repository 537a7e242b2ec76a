"""The HTTPS adapter: DICOMweb (PS3.18) and the JSON API, on FastAPI behind uvicorn."""
