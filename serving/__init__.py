"""serving step of vitalrisk (see DESIGN.md)."""
