"""Native (C) CPU loops for the hottest parts of the model steps; see :mod:`.native`."""
