"""The base of every error a user can fix by changing their input (job file, data, run folder, checkpoint).

The command line prints such an error as `hpcseg: error: <line>` (one line per problem in `.problems` if it has
them), exits 2 and shows no traceback. This module imports nothing heavy, so catching it costs nothing.
"""


class UserError(Exception):
    """Bad input, named in the message."""
