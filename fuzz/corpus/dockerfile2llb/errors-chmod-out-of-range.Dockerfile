FROM scratch
COPY --chmod=17777 a.txt /
