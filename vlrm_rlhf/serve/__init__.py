"""Served rewards on Ray Serve: a replicated, batched VLRM behind a URL (``vlrm-rlhf serve``).

Sits above ``reward/`` (nothing below imports it). The server side needs the ``serve`` extra (``ray[serve]``);
the client (``reward/remote.py``) needs neither Ray nor this package.
"""
