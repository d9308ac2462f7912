FROM scratch
COPY --from=extra /f.txt /got.txt
