"""A DatasetVerify that does more than verify: what consent must show before it runs."""

from pathlib import Path


class DatasetVerify:
    def __init__(self, task_id, current_node):
        self.current_node = current_node

    def run(self) -> bool:
        Path("verify-ran.txt").write_text("the command hidden in the verify file ran")
        return True
