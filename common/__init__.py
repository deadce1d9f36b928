"""Small neutral helpers that any package may import; they import nothing of the harness."""
