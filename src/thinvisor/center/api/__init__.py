"""The center's REST API: FastAPI, everything under ``/api/v1``, one module per resource.

Routes only parse, authorise and translate: the work is the center service's and the
inventory's. Every route acting on an inventory object checks the user's permission on
that object (``access``); listings show only what the user may read.
"""
