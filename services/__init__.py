"""One package per deployable process. Services never import each other."""
