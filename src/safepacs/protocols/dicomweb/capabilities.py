"""Retrieve Capabilities (PS3.18 8.9): ``OPTIONS`` on the DICOMweb root or any resource under it.

The answer is a WADL document (``application/vnd.sun.wadl+xml``, the PS3.18 8.9.1 default) built
from the routes the server really has, and an ``Allow`` header naming the methods of the path
asked about.  Like every DICOMweb request it needs credentials: capabilities say nothing about
patients, but an anonymous caller learns nothing at all.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from safepacs.types import Principal

__all__ = ["WADL", "install_capabilities"]

WADL = "application/vnd.sun.wadl+xml"
_NS = "http://wadl.dev.java.net/2009/02"
PREFIX = "/dicomweb"


_Operations = dict[str, dict[str, dict[str, Any]]]  # path -> method -> OpenAPI operation


def _dicomweb_operations(app: FastAPI) -> _Operations:
    """The DICOMweb operations the server has, from its own OpenAPI document (the routes as served)."""
    paths: dict[str, dict[str, Any]] = app.openapi().get("paths", {})
    out: _Operations = {}
    for path, item in paths.items():
        if not path.startswith(PREFIX + "/"):
            continue
        methods = {m.upper(): op for m, op in item.items() if m.upper() in _METHODS}
        if methods:
            out[path] = methods
    return out


_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH"}


def _wadl(request: Request, operations: _Operations) -> bytes:
    ET.register_namespace("", _NS)
    app = ET.Element(f"{{{_NS}}}application")
    base = str(request.base_url).rstrip("/") + PREFIX + "/"
    resources = ET.SubElement(app, f"{{{_NS}}}resources", base=base)
    for path in sorted(operations):
        resource = ET.SubElement(resources, f"{{{_NS}}}resource", path=path[len(PREFIX) + 1 :])
        for method, op in sorted(operations[path].items()):
            node = ET.SubElement(resource, f"{{{_NS}}}method", name=method, id=str(op.get("operationId", "")))
            if op.get("summary"):
                doc = ET.SubElement(node, f"{{{_NS}}}doc")
                doc.text = str(op["summary"])
            params = [p["name"] for p in op.get("parameters", []) if p.get("in") == "query"]
            if params:
                req = ET.SubElement(node, f"{{{_NS}}}request")
                for name in params:
                    ET.SubElement(req, f"{{{_NS}}}param", name=name, style="query")
    return bytes(ET.tostring(app, encoding="utf-8", xml_declaration=True))


def _allow(methods: set[str]) -> str:
    return ", ".join(sorted(methods | {"OPTIONS"}))


def install_capabilities(app: FastAPI, principal_of: Callable[[Request], Principal]) -> None:
    """Answer ``OPTIONS`` on the DICOMweb root and on every DICOMweb route; call after adding them all."""
    operations = _dicomweb_operations(app)

    def answer(request: Request, ops: _Operations) -> Response:
        principal_of(request)
        methods = {m for item in ops.values() for m in item}
        return Response(_wadl(request, ops), media_type=WADL, headers={"Allow": _allow(methods)})

    def endpoint(ops: _Operations) -> Callable[[Request], Response]:
        def options(request: Request) -> Response:  # annotated: FastAPI passes the request itself
            return answer(request, ops)

        return options

    app.add_api_route(PREFIX, endpoint(operations), methods=["OPTIONS"], include_in_schema=False)
    for path in operations:
        app.add_api_route(
            path, endpoint({path: operations[path]}), methods=["OPTIONS"], include_in_schema=False
        )
