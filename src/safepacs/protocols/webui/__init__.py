"""The web UI for people: server-rendered pages (Jinja2) on the HTTPS server, beside DICOMweb.

Every page works through the same services as DICOMweb (query, retrieve, delete, administration,
audit search), so the same policy decides and the same audit trail records the person, their
address and their browser's user agent.  See ``docs/web-ui.md``.
"""
