"""The kvbench leaderboard: a Streamlit app over a results folder.

``data`` loads, filters and aggregates (plain pandas, tested directly); ``charts`` builds the Plotly
figures; ``app`` is the Streamlit script; ``screenshot`` serves the app and captures it in headless
Chromium. Start it with ``kvbench leaderboard [--results DIR] [--port N]``.
"""
