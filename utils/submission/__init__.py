"""Submission: ``lists`` (top-10 lists, validation, the body), ``client`` (the URL check and its
redaction, the POST), ``ledger`` (every attempt, written ahead), ``preview`` (HTML of the lists),
``stages`` (submit.py's steps), ``server`` (local), ``server_check`` (preflight's GET)."""
