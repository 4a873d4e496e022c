"""One FlowAdapter per LeRobot flow policy type (DESIGN.md §5)."""
