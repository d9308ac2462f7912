FROM scratch
ARG SUM={{COMMIT2}}
ADD --checksum=$SUM {{GIT}}/repo.git#main /r
