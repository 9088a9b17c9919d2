"""`mixsd edit`: locate-and-edit (MEMIT), the editing baseline."""
