"""Running ``safepacs serve``: the supervisor process (``supervisor.py``) that binds the listeners and
forks, restarts and stops the processes serving them (``protocols/dimse``, ``protocols/dicomweb``), and
the background jobs (``jobs.py``: the trash purge, the audit export of ``audit_export.py``) that run
whichever listeners are enabled.  Nothing below imports this package; only ``cli`` does."""
