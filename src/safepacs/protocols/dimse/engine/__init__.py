"""Everything of SafePACS that reaches into pynetdicom's private parts, checked against :data:`CHECKED`.

pynetdicom's public API (``AE``, ``evt``, ``sop_class``, presentation contexts, status, primitives)
does not let a PACS store, send and answer at speed, nor decide admission before negotiation; so the
modules of this package subclass and patch its internals.  Only these modules do: the rest of
``safepacs.protocols.dimse`` uses its public API and this package.  pynetdicom gives no guarantee for
any of the following, between any two releases, so ``pyproject.toml`` pins the minor release checked
(``pynetdicom>=3.0.4,<3.1``), and ``safepacs serve`` refuses a pynetdicom not listed in
:data:`CHECKED` unless ``server.unchecked_pynetdicom`` is set (:func:`check_pynetdicom`).

On an upgrade of pynetdicom, read its changes to each of these, then run the differential tests
(``tests/integration/test_dimse_fastpath.py``, ``tests/interop/test_dimse_sendpath.py``,
``tests/interop/test_find_encoding.py``)
and the DIMSE tests, and only then add the version to :data:`CHECKED` (and move the pin):

``fastpath.py`` (the C-STORE receive path)
    subclasses ``pynetdicom.dul.DULServiceProvider`` (``StoreDUL``): overrides ``run_reactor`` (its
    loop re-implemented in ``_react``), ``send_pdu``, ``kill_dul``, ``stop_dul``, ``_read_pdu_data``;
    calls ``_process_recv_primitive``, ``_is_transport_event``, ``_decode_pdu``; uses its
    ``_idle_timer``, ``artim_timer``, ``_kill_thread``, ``event_queue``, ``to_provider_queue``,
    ``to_user_queue``, ``_recv_pdu``, ``state_machine``
    (``current_state``, ``do_action``, state names Sta1/3/6/13, event names Evt5/9/17/18/19),
    ``socket`` (``pynetdicom.transport.AssociationSocket.socket``); ``pynetdicom.fsm.InvalidEventError``;
    ``pynetdicom.dsutils.decode``; the association's ``_dul_ready``, ``_accepted_cx``, ``_kill``,
    ``is_aborted``, ``is_established``, ``acceptor``/``requestor.maximum_length`` and ``address_info``;
    replaces ``time`` in ``pynetdicom.association`` (``_ReactorClock``, keyed to the code object of
    ``Association._run_reactor``); ``install_store_path`` swaps ``assoc.dul`` and re-applies the timeout
    setters.
``sendpath.py`` (C-GET/C-MOVE sub-operations)
    subclasses ``StoreDUL`` further (``SendDUL``): overrides ``_abort_now``, ``_send``,
    ``_process_recv_primitive``; puts its own ``P_DATA`` subclass (``RawPData``) on the DUL's
    ``to_provider_queue``; ``pynetdicom.pdu.P_DATA_TF``, ``pynetdicom.dimse_messages.C_STORE_RSP``
    (``command_set``, ``message_to_primitive``), ``pynetdicom.dsutils.decode``; the association's
    ``dimse.msg_queue``, ``dimse.get_msg``, ``dimse_timeout``, ``is_requestor``.
``raw.py`` (stored bytes out, through pynetdicom's C-GET/C-MOVE service classes)
    replaces ``Association.send_c_store``, ``Association._serve_request`` and the DIMSE provider's
    ``send_msg`` on each association; uses ``_reactor_checkpoint``, ``_is_paused``,
    ``_get_valid_context``, ``_handle_no_response``, ``_check_received_status``, ``dul._idle_timer``,
    ``dimse.send_msg``/``get_msg``/``maximum_pdu_size``/``dul.send_pdu``,
    ``pynetdicom.dimse._RSP_TO_MESSAGE`` (``primitive_to_message``, ``encode_msg``) and
    ``evt.trigger``; relies on the service classes reading only ``SOPClassUID``, ``SOPInstanceUID``
    and truth of what a handler yields (``RawInstance``), and ``.Status`` of what ``send_c_store``
    returns (``StoreStatus``).
``findfast.py`` (pending C-FIND responses)
    the association's ``dimse.maximum_pdu_size``, ``is_established``, the DUL's ``is_alive``; the
    PDU framing of ``DIMSEMessage.encode_msg``.
``acse.py`` (admission before negotiation)
    subclasses ``pynetdicom.acse.ACSE`` (``GateACSE``) and overrides ``_negotiate_as_acceptor``; uses
    ``requestor.primitive``/``address_info``/``user_identity``/``role_selection``/``ae_title``,
    ``acceptor.supported_contexts``/``add_negotiation_item``, ``send_reject``, ``assoc.dul.socket``,
    ``assoc.dul.artim_timer``, ``assoc.kill``, ``evt.trigger(EVT_REJECTED)``; replaces ``assoc.acse``.
``transport.py`` (the worker's AE and servers)
    overrides ``AE._create_socket``, extends ``AE._servers``; calls
    ``RequestHandler._create_association`` (which takes the connection from ``self.request``, the TLS
    socket once ``server.py`` has wrapped it) and ``evt.trigger(EVT_CONN_OPEN)`` in place of its ``handle``;
    overrides ``AssociationServer.server_bind``, ``server_activate``, ``get_request``, ``server_close``,
    ``service_actions`` of ``ThreadedAssociationServer``.
``pdu.py``
    ``pynetdicom.pdu.A_ASSOCIATE_RQ`` (``decode``, ``to_primitive``), ``A_ABORT_RQ`` (``encode``).
``slots.py``
    sets ``_safepacs_*`` attributes on ``Association`` objects.
"""

from __future__ import annotations

import logging

import pynetdicom

from safepacs.errors import ConfigError

__all__ = ["CHECKED", "check_pynetdicom", "installed_pynetdicom", "is_checked"]

log = logging.getLogger(__name__)

#: The pynetdicom releases whose private parts (the module docstring) these modules were checked against.
CHECKED: tuple[str, ...] = ("3.0.4",)


def installed_pynetdicom() -> str:
    """The version of the pynetdicom imported."""
    return str(getattr(pynetdicom, "__version__", "unknown"))


def is_checked(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) is one this package was checked against."""
    return (installed_pynetdicom() if version is None else version) in CHECKED


def check_pynetdicom(*, allow_unchecked: bool = False) -> None:
    """Refuse (:class:`~safepacs.errors.ConfigError`) to serve DIMSE with a pynetdicom not in
    :data:`CHECKED`; with ``allow_unchecked`` (``server.unchecked_pynetdicom``) warn instead."""
    version = installed_pynetdicom()
    if version in CHECKED:
        return
    checked = ", ".join(CHECKED)
    if allow_unchecked:
        log.warning(
            "pynetdicom %s is not a version SafePACS's DICOM engine was checked with (%s); serving anyway "
            "because server.unchecked_pynetdicom is set: C-STORE, C-FIND and retrieve may fail",
            version,
            checked,
            extra={"pynetdicom": version, "checked": checked},
        )
        return
    raise ConfigError(
        f"pynetdicom {version} is installed, but SafePACS's DICOM engine was checked only with pynetdicom "
        f"{checked}: it relies on pynetdicom internals that may have changed.  Install a checked version "
        f"(pip install 'pynetdicom=={CHECKED[-1]}'), or set server.unchecked_pynetdicom = true to serve "
        "anyway at your own risk"
    )
