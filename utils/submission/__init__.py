"""Submission: top-10 lists, their validation and body, the HTTP client, and the local server."""
