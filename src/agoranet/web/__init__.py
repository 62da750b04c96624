"""Layer 5, beside the CLI: the dashboard page, the status document and metrics every node serves."""

from agoranet.web.dashboard import Dashboard, mount_dashboard

__all__ = ["Dashboard", "mount_dashboard"]
