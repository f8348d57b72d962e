"""Subcommands of the ``pagedkv`` CLI (see ``pagedkv.cli``)."""
