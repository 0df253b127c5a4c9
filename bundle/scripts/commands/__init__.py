"""The commands of ``surgical-sam`` (:mod:`scripts.cli`), one module per family; :mod:`.registry` holds what
they share (the user-error handling, the argument parsers)."""
