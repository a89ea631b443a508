"""`edgeship demo`: the whole story on the built-in example."""
