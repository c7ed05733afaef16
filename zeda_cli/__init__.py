"""The ``zeda`` command line: one subcommand module each."""
