"""The doctor's configuration review for the web UI's posture page, run inside the HTTPS process.

The web UI may not import the scanner (``pyproject.toml``: the scanner shares no code with the server
it audits, and the UI uses nothing of it), so the composition is made here, above both: the HTTPS
process builds its site with :func:`configuration_review` (``runtime/supervisor.py``), and the
``safepacs doctor`` command gathers its input with the same :func:`doctor_input`.

Only the configuration half of the doctor runs in the server (settings, data directory files, peers,
accounts, disk space): its network half would make the HTTPS process probe its own listeners over
DICOM and TLS for several seconds per page view, and each probe would land in the audit trail as a
stranger's association.  The listeners are reviewed from outside by ``safepacs scan --save-to-data``,
whose latest report the page shows beside.  The scanner (pynetdicom, httpx) is imported at the first
view of the page, not when the process starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safepacs.app import Archive
    from safepacs.config import Settings
    from safepacs.db.ports import Directory
    from safepacs.scan.doctor import DoctorInput
    from safepacs.storage.space import AuditReserve, FreeSpace

__all__ = ["configuration_review", "doctor_input"]


def doctor_input(
    settings: Settings, directory: Directory, space: FreeSpace, reserve: AuditReserve | None
) -> DoctorInput:
    """What the doctor's review needs, read from the directory (peers, accounts) and the disk."""
    from safepacs.scan.doctor import AccountInfo, DiskInfo, DoctorInput

    accounts = []
    for user in directory.list_users():
        state = directory.get_login_state(user.name)
        accounts.append(
            AccountInfo(
                user.name,
                frozenset(user.roles),
                user.disabled,
                user.must_change_password,
                state is not None and state.totp_secret is not None,
            )
        )
    disk = DiskInfo(
        [(str(path), free, needed) for path, free, needed in space.below()],
        str(reserve.path) if reserve is not None else None,
        reserve.held() if reserve is not None else None,
    )
    return DoctorInput(settings, directory.list_peers(), accounts, disk)


def configuration_review(archive: Archive) -> dict[str, Any]:
    """``safepacs doctor --no-network`` of this archive, as the JSON report of ``--format json``
    (what :func:`safepacs.protocols.webui.site.create_site` takes as ``review``)."""
    from safepacs.scan.doctor import run_doctor
    from safepacs.scan.report import as_dict

    inp = doctor_input(archive.settings, archive.directory, archive.space, archive.reserve)
    return as_dict(run_doctor(inp, network=False))
