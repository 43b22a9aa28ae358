"""Subcommands of the ``multitap-rl`` CLI (one module each; see ``multitap_rl.cli``)."""
