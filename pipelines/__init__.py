"""One file per model family behind one interface (`ModelSpec` in base.py); `registry.get_spec(name)` finds them."""
