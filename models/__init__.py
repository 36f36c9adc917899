"""models step of vitalrisk (see DESIGN.md)."""
