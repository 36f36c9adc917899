"""monitoring step of vitalrisk (see DESIGN.md)."""
