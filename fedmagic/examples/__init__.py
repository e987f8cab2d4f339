"""Example tasks that ship with fedmagic; ``fedmagic demo`` runs ``digits_task.py``."""
