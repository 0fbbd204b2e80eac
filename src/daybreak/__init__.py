"""daybreak."""
