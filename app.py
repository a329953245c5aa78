"""DPR Lens: what a general/pre-trained encoder and its DPR-trained twin retrieve, and why."""

import logging

import streamlit as st

from ui.frame import navigate

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("dpr_lens").setLevel(logging.INFO)
st.set_page_config(page_title="DPR Lens", page_icon=":material/search:", layout="wide")

navigate()
