"""ROBE-Z parameter sharing (method ``robe``, recipe ``method = "share"``): hash, array, module,
projection of trained tables, and the method's registry handler (:mod:`.method`)."""
