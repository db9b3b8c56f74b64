"""The Streamlit document analyst: pages, services and settings."""
