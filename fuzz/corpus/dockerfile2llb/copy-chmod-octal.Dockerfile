FROM scratch
COPY --chmod=0600 a.txt /m.txt
