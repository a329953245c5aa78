"""DPR Lens: what a general/pre-trained encoder and its DPR-trained twin retrieve, and why."""
import streamlit as st

from ui.state import sidebar

st.set_page_config(page_title="DPR Lens", page_icon="🔎", layout="wide")

st.session_state["selection"] = sidebar()
navigation = st.navigation([
    st.Page("pages/retrieval.py", title="Retrieval", icon="🔎", default=True),
])
navigation.run()
