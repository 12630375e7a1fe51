"""The one exception type for bad input the user can fix.

Entry points catch it, print `error: <message>` and exit with status 2, so a wrong key, a
missing dataset or a mismatched checkpoint never ends in a bare traceback.

    raise UserError(f"{path}: not a CIFAR-10 folder (expected data_batch_1..5)")
"""


class UserError(Exception):
    """Bad input (config, data, checkpoint); the message names the file or key."""
