"""Submission: ``lists`` (top-10 lists, validation, the body), ``client`` (the POST), ``ledger``
(every attempt), ``preview`` (HTML of the lists), ``stages`` (submit.py's steps), ``server`` (local)."""
