"""DPR Lens: what a general/pre-trained encoder and its DPR-trained twin retrieve, and why."""

import logging

import streamlit as st

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("dpr_lens").setLevel(logging.INFO)
st.set_page_config(page_title="DPR Lens", page_icon=":material/search:", layout="wide")

navigation = st.navigation(
    [
        st.Page("pages/retrieval.py", title="Retrieval", icon=":material/search:", default=True),
        st.Page("pages/token_attributions.py", title="Token attributions", icon=":material/format_color_text:"),
        st.Page("pages/knowledge_neurons.py", title="Knowledge neurons", icon=":material/neurology:"),
        st.Page("pages/probing_evaluation.py", title="Probing & evaluation", icon=":material/monitoring:"),
        st.Page("pages/twins.py", title="Twin analyses", icon=":material/compare_arrows:"),
    ]
)
navigation.run()
