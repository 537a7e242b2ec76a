"""Running ``safepacs serve``: the supervisor process (``supervisor.py``) that binds the listeners and
forks, restarts and stops the processes serving them (``protocols/dimse``, ``protocols/dicomweb``), and
the processes of the background jobs (``jobs.py``: an hourly purge child for the trash, and the audit
export of ``audit_export.py`` when collectors are configured), which run whichever listeners are
enabled.  Nothing below imports this package; only ``cli`` does."""
