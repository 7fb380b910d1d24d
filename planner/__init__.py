"""tandem.planner"""
