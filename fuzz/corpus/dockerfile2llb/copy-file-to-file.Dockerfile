FROM scratch
COPY a.txt /dst/renamed.txt
