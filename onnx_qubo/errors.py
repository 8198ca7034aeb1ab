"""The one exception type users see: a problem with what they gave us, stated in one line."""


class QuboInputError(ValueError):
    """Bad input (model, data, flag or path). The message names the node, file or flag at fault."""
